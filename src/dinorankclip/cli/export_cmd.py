"""``dinorankclip export``: write a checkpoint's trunk in another library's format."""

from __future__ import annotations

import json

NAME = "export"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export the CLIP trunk of a checkpoint for open_clip",
        description="Write the CLIP trunk of a checkpoint as a folder that open_clip loads with "
                    "open_clip.create_model('local-dir:DIR'). Only the trunk is exported: its embeddings equal "
                    "the checkpoint's clip_image_features and clip_text_features, not the fused embeddings, "
                    "which need the DinoRankCLIP student.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run folder or model.safetensors file")
    p.add_argument("--format", default="open_clip", choices=("open_clip",), help="output format (default open_clip)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")


def run(args) -> int:
    from ..eval.export import export_open_clip

    info = export_open_clip(args.checkpoint, args.out)
    print(json.dumps(info, indent=2))
    return 0
