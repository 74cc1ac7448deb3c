"""Generated protocol code for fedpriv.v1 (from proto/fedpriv/v1; never edit by hand)."""
