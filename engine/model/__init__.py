"""Model architectures built from kernel calls; differences between families are config flags."""
