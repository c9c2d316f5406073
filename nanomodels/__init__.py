"""nanomodels"""
