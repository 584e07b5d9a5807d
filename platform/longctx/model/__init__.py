"""Model loading and RoPE changes. Knows nothing of Ray or DeepSpeed (those live in `longctx.train`)."""
