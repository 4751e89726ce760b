"""Entry points, run as scripts (`torchrun launch/infer.py ...`) or imported by tests (`from launch import infer`)."""
