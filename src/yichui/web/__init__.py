"""The web dashboard's assets (``static/``), served at ``/ui`` by ``yichui.api.ui``."""
