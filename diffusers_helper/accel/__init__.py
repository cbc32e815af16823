"""Making the transformer faster or smaller: attention kernels, regional compile, FP8 and integer weights,
and the cache of an already converted transformer."""
