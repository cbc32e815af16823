"""More than one GPU: one video across the GPUs of a host (context parallel ranks), and a pool of workers that
each run whole jobs (Ray). Above the pipeline, below the app: both drive `pipeline.engine.Engine` unchanged."""
