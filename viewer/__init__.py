"""The viser viewer: ``budget3d view RUN``."""
