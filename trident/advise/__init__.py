"""`trident advise`: which model, weight format and KV cache meet a target on this machine."""
