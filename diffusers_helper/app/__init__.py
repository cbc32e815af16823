"""What the web app and the CLI share: start-up, the compatibility check, the engine provider, the job queue."""
