"""A discrete-event and a fleet simulator of serve_app under Ray Serve autoscaling."""
