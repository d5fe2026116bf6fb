"""Surface: the mesh and the Gaussian splats built from the fused cloud (or from one photo)."""
