"""budget3d: 3D Gaussian Splatting to an exact budget, distilled to a mobile light field."""

__version__ = "0.1.0"

from budget3d.errors import UserError  # noqa: E402,F401
