"""The web panel (Gradio): its layout, its forms, views and actions, and the training process it starts."""
