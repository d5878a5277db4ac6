"""TensorRT engines for an artifact, and the Polygraphy check of its graphs."""
