"""Where models live: how much memory there is, the placement policy, the block streamer."""
