"""Schedules, forward process, losses and samplers (model-agnostic)."""
from concept_diffusion.diffusion.sampling import PREDICTIONS, SPACINGS, chain, ddim_sample, ddim_timesteps, ddpm_sample, last_timestep
from concept_diffusion.diffusion.schedule import (LOSS_WEIGHTINGS, SCHEDULES, TIMESTEP_SAMPLINGS, Schedule,
                                                  loss_weights, make_beta_schedule, make_schedule, noise_loss,
                                                  predict_x0, q_sample, sample_timesteps, schedule_from_betas)
