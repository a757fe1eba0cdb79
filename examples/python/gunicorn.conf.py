# gunicorn settings for gunicorn_app.py: the app (and its PKCS#11 login) is loaded once in the
# master, then two sync workers are forked from it.
preload_app = True
workers = 2
worker_class = "sync"
timeout = 20  # a worker stuck in the module is killed by the master after this
graceful_timeout = 5  # on stop, workers get this long to finish
bind = "127.0.0.1:8000"  # override with --bind
control_socket_disable = True  # no gunicornc socket in $HOME (gunicorn 25.1 and later)
