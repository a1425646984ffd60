"""shapeflow: end-to-end 3D shape generative models (data, VecSet and voxel-grid VAEs, rectified-flow DiTs).

Conventions live in one place each:

* canonical frame and SDF sign: :mod:`shapeflow.geometry.frame`
* grid (node and cell grids, index <-> world): :mod:`shapeflow.geometry.grid`
* flow time direction: :mod:`shapeflow.flow`
"""

__version__ = "0.1.0"
