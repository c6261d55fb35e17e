"""The PPO-family roles as Ray actors: their placement, the weight sync between them, and timed remote calls."""
