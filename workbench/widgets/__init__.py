"""Interactive views for JupyterLab (ipywidgets + plotly).

They use the engine; the engine never imports them.
"""
