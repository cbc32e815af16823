"""Model parts: where each lives (`specs`), one loading path (`loading`), the offline tiny preset and the
full-size random-weight builders for benchmarks."""
