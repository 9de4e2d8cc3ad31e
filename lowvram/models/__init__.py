"""The models lowvram trains: from-scratch sizes and local SD 1.x/2.x/SDXL and FLUX.1 checkpoints."""
