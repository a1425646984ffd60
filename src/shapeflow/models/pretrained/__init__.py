"""Converters of public releases into shapeflow's checkpoint format (:mod:`shapeflow.checkpoint`).

Each module turns one project's released files into a :class:`~shapeflow.checkpoint.Release` (a config
dict and a state dict in shapeflow's key names and conventions) and exposes it as ``FORMAT``, which the
model family lists in its ``releases``; ``Model.from_pretrained(path)`` and
:func:`shapeflow.models.load_model` then accept the released files as they are published.

==========================  ===========================================  ==============
module                      release                                      family
==========================  ===========================================  ==============
``hunyuan_vae``             Hunyuan3D-2.1 / 2.0 ShapeVAE                 ``vecset_vae``
``trellis_ss_vae``          TRELLIS ``ss_enc/ss_dec_conv3d_16l8_fp16``   ``grid_vae``
``trellis_ss_flow``         TRELLIS ``ss_flow_img_dit_L_16l8_fp16``      ``grid_dit``
==========================  ===========================================  ==============

Converters build no model and import no model module, so a family can list them without a cycle.
"""
