"""The training engine (issue 4).

`losses`, `regularizers` and `ema` are pure functions and small state holders with no knowledge
of the loop, of DeepSpeed or of the spec: they take logits, modules and tensors and return
tensors. The loop owns every `backward()` and every optimizer step.
"""
