"""Pure tensor math for merging, no I/O: every function is tested against a dense oracle."""
