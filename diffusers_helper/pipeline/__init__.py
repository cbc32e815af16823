"""One job end to end: request, conditioning, section schedule, sampler, decode and writing, as events."""
