"""The augmentations: `settings` (one recipe per view, presets), `draws` (each view's random numbers and
settings as named fields), `pil` (Pillow ops, one image at a time) and `tensor` (batched tensor ops, on any
device). Both ops map the same draws through the same distributions."""
