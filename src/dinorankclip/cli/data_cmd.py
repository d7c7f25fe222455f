"""``dinorankclip data pack``: write WebDataset shards from a CSV/TSV table."""

from __future__ import annotations

import json

NAME = "data"


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare training data (pack a table into WebDataset shards)")
    actions = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    pack = actions.add_parser(
        "pack", help="write WebDataset shards (img2dataset layout) and sizes.json from a CSV/TSV table",
        description="Write KEY.jpg/png/webp (image bytes as stored), KEY.txt (caption) and KEY.json for every row "
                    "whose image can be read and decoded, in shards of --shard-size samples, plus sizes.json "
                    "(sample count per shard). Prints the brace pattern to use as data.train and the number of "
                    "rows skipped per reason.",
    )
    pack.add_argument("table", metavar="CSV", help="CSV/TSV with image paths (relative to its folder) and captions")
    pack.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards")
    pack.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    pack.add_argument("--prefix", default="shard", help="shard file-name prefix (default shard)")
    pack.add_argument("--filepath-column", default="filepath", metavar="NAME", help="image path column")
    pack.add_argument("--caption-column", default="caption", metavar="NAME", help="caption column")
    pack.add_argument("--second-caption-column", metavar="NAME",
                      help="column of a second caption (ALIP), stored in KEY.json under the same name")
    pack.add_argument("--separator", help="field separator (default: tab for .tsv, comma otherwise)")
    pack.add_argument("--overwrite", action="store_true",
                      help="replace the PREFIX-*.tar shards already in --out and delete those beyond the new count "
                           "(without it, existing shards are an error)")


def run(args) -> int:
    from ..data.pack import pack_shards

    result = pack_shards(
        args.table, args.out, shard_size=args.shard_size, prefix=args.prefix,
        filepath_column=args.filepath_column, caption_column=args.caption_column,
        second_caption_column=args.second_caption_column, separator=args.separator, overwrite=args.overwrite,
    )
    summary = {"shards": len(result.shards), "samples": result.num_samples, "skipped": len(result.skipped)}
    summary.update({f"skipped_{kind}": count for kind, count in sorted(result.skipped_kinds.items())})
    if result.removed:
        summary["removed_shards"] = len(result.removed)
    summary["data.train"] = result.pattern
    print(json.dumps(summary, indent=2))
    return 0
