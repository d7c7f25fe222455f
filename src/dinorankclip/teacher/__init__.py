"""Frozen DINOv3 teacher: building it with timm, loading weights from disk, and extracting its features."""

from dinorankclip.teacher.build import build_teacher, dinov3_model_names
from dinorankclip.teacher.dinov3 import DinoV3Teacher, TeacherOutput, teacher_input_size
from dinorankclip.teacher.loading import load_teacher_weights

__all__ = [
    "DinoV3Teacher",
    "TeacherOutput",
    "build_teacher",
    "dinov3_model_names",
    "load_teacher_weights",
    "teacher_input_size",
]
