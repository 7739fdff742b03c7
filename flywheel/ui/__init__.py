"""The people-facing layer: ipywidgets builders for notebooks and Voila dashboards, and their launcher."""
