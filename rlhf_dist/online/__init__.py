"""One driver for every online algorithm: rollout -> experience -> advantages -> learner update -> sync -> checkpoint."""
