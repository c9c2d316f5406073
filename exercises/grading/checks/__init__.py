"""One module per chapter, chNN.py: EXERCISES = {"N.M": Exercise(points, hint, checks)} and the checks."""
