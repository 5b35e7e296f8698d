"""Client side of Tamiyo: the streaming client and the reference KasminaLayer."""
