"""Evaluation: disentanglement metrics matching google-research/disentanglement_lib."""
from concept_diffusion.evaluation.metrics import (ALL_METRICS, DEFAULT_METRICS, DCIResult, compute_beta_vae,
                                                  compute_dci, compute_factor_vae, compute_mig,
                                                  compute_modularity_explicitness, compute_sap,
                                                  dci_importance_matrix, evaluate_codes, reduce_tokens_pca)

__all__ = ["ALL_METRICS", "DEFAULT_METRICS", "DCIResult", "compute_beta_vae", "compute_dci", "compute_factor_vae",
           "compute_mig", "compute_modularity_explicitness", "compute_sap", "dci_importance_matrix",
           "evaluate_codes", "reduce_tokens_pca"]
