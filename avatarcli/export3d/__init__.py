"""Export3D: tri-plane generator, volume rendering and super-resolution (issue 14)."""
