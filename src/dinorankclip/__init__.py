"""DinoRankCLIP: CLIP pretraining with a frozen DINOv3 teacher and high-order Plackett-Luce ranking."""

__version__ = "0.1.0"
