"""Training: data, the SDLM loss (dense reference and the fast two-pass step), the loop."""
