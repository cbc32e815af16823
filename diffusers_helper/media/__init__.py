"""Files a job writes (MP4, PNG, JSON sidecar, written atomically) and the cheap latent preview."""
