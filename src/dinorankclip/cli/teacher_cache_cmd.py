"""``dinorankclip teacher-cache``: run the frozen teacher once over a dataset and store its features."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random

from ..config import ConfigError, list_presets, load_config
from .common import OVERRIDE_HELP

NAME = "teacher-cache"

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "teacher-cache",
        help="precompute teacher features for a dataset (train later with teacher.cache=DIR)",
        description="Run the configured DINOv3 teacher (teacher.name, teacher.weights, teacher.image_size, "
                    "teacher.blocks) once over every distinct image of a table or of WebDataset shards, reduce its "
                    "CLS and patch tokens by "
                    "PCA and store them as float16 shards in DIR. Features are computed on the centre square of "
                    "each image. Run the same command again to resume an interrupted build.",
    )
    p.add_argument("--data", required=True, metavar="DATA",
                   help="CSV/TSV with a filepath column (data.filepath_column; paths relative to the table), or "
                        "WebDataset shards such as 'shards/{000000..000099}.tar' (keyed by __key__)")
    p.add_argument("--out", required=True, metavar="DIR", help="cache folder, empty or holding an unfinished build")
    p.add_argument("--config", metavar="FILE",
                   help="YAML config file or preset name for the teacher and data settings "
                        f"({', '.join(list_presets())})")
    p.add_argument("--pca-dim", type=int, default=256, metavar="W", help="PCA width of stored tokens (default 256)")
    p.add_argument("--pca-images", type=int, default=2048, metavar="N",
                   help="images the PCA is fitted on: a random sample of a table, the first images of shards "
                        "(default 2048)")
    p.add_argument("--shard-size", type=int, default=256, metavar="N", help="images per shard file (default 256)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per teacher pass (default 64)")
    p.add_argument("--threads", type=int, default=4, metavar="N", help="image decoding threads (default 4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="seed of the PCA sample and of random teacher weights (default train.seed)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)


def run(args) -> int:
    import torch

    from ..data.shards import expand_shards, shard_sizes
    from ..teacher import build_teacher
    from ..teacher.cache import weights_fingerprint
    from ..teacher.cache_build import CacheBuildSettings, build_teacher_cache, shard_samples, table_samples
    from ..train.distributed import resolve_device

    cfg = load_config(args.config, list(args.overrides))
    if cfg.teacher.weights is None:
        raise ConfigError("teacher.weights is not set; give the local DINOv3 weights the cache is made from "
                          "(teacher.weights=PATH, or teacher.weights=random for tests)")
    settings = CacheBuildSettings(pca_dim=args.pca_dim, shard_size=args.shard_size, batch_size=args.batch_size,
                                  num_threads=args.threads, max_bad_fraction=cfg.data.max_bad_fraction)
    if args.pca_images < 2:
        raise ConfigError(f"--pca-images {args.pca_images} is invalid; the PCA needs at least 2 images")
    seed = cfg.train.seed if args.seed is None else args.seed

    data_cfg = dataclasses.replace(cfg.data, train=args.data)
    if data_cfg.is_webdataset:
        image_keys = tuple(key.strip().lower() for key in data_cfg.image_key.split(";") if key.strip())

        def read_shards():
            return shard_samples(args.data, image_keys=image_keys, caption_key=data_cfg.caption_key,
                                 exif_transpose=data_cfg.exif_transpose)

        samples = read_shards()
        # NOTE: the PCA is fitted on the first images of the shards, a fair sample only when the shards are not
        # sorted by content.
        pca_samples = itertools.islice(read_shards(), args.pca_images)
        total = shard_sizes(expand_shards(args.data))
        described = f"WebDataset shards {args.data} ({total or 'unknown number of'} samples)"
    else:
        rows = table_samples(args.data, filepath_column=cfg.data.filepath_column, separator=cfg.data.separator,
                             exif_transpose=cfg.data.exif_transpose)
        distinct = list(dict(rows).items())
        samples = rows
        pca_samples = random.Random(seed).sample(distinct, min(args.pca_images, len(distinct)))
        total = len(distinct)
        described = f"{total} distinct images of {args.data} ({len(rows)} rows)"

    device = resolve_device(args.device)
    # The same seed as the trainer's, so a random teacher here equals the one that online training builds.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = build_teacher(cfg.teacher.name, cfg.teacher.weights, blocks=tuple(cfg.teacher.blocks),
                                autocast_bf16=cfg.teacher.autocast, **cfg.teacher.model_kwargs)
    fingerprint = weights_fingerprint(cfg.teacher.weights, random_seed=seed)
    logger.info("Caching %s features of %s into %s", cfg.teacher.name, described, args.out)
    manifest = build_teacher_cache(
        teacher,
        samples,
        args.out,
        pca_samples=pca_samples,
        model_kwargs=cfg.teacher.model_kwargs,
        weights_fingerprint=fingerprint,
        requested_blocks=list(cfg.teacher.blocks),
        image_size=cfg.teacher.image_size,
        data_path=args.data,
        settings=settings,
        device=device,
        total=total,
    )
    summary = {"cache": str(args.out), **{k: manifest["data"][k] for k in ("rows", "keys", "cached", "bad")},
               "pca_dim": manifest["pca"]["dim"], "shards": len(manifest["shards"])}
    print(json.dumps(summary, indent=2))
    return 0
