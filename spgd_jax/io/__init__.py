"""Files: images, checkpoints, plots and atomic writes (the applications' side; the core never imports it)."""
