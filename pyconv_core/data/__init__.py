"""Data sets in their real formats, transforms, and the embedded demo sets."""
