"""Frozen DINOv3 teacher: building it with timm, loading weights from disk, and extracting its features."""

from dinorankclip.teacher.dinov3 import DinoV3Teacher, TeacherOutput, teacher_input_size

__all__ = ["DinoV3Teacher", "TeacherOutput", "teacher_input_size"]
