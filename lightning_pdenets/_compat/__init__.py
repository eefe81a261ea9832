"""Small compatibility shims for third-party packages (private: not auto-exported)."""
