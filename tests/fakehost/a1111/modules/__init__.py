# Fake of the AUTOMATIC1111 WebUI `modules` package, v1.10.1 (kklouzal/stable-diffusion-webui @ 82a973c0).
