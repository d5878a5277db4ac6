"""Victims: the zoo of classifiers, their taps, weights, the BatchNorm fold, and the flags that name a victim."""
