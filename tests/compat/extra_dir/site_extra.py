"""Importable only through the path entry that site_dir/sitecustomize.py adds."""

VALUE = "site extra module"
