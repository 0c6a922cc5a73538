"""VAE baselines (beta-VAE, beta-TCVAE) as disentanglement_lib trains them, on this package's data and evaluation.

`vae` has the model, `losses` the objectives, `trainer` the training/evaluation driver that
experiments/train.py runs when config.baseline.kind is set.
"""
