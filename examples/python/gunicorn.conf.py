# gunicorn settings for gunicorn_app.py: the app (and its PKCS#11 login) is loaded once in the
# master, then two sync workers are forked from it.
import os

preload_app = True
workers = 2
worker_class = "sync"
timeout = 20  # a worker stuck in the module is killed by the master after this
graceful_timeout = 5  # on stop, workers get this long to finish
bind = "127.0.0.1:8000"  # override with --bind
control_socket_disable = True  # no gunicornc socket in $HOME (gunicorn 25.1 and later)
# Started as root, the workers may switch to another user right after fork, as servers' workers
# do (run_gunicorn.py --worker-user nobody sets these; in a configuration of your own, write
# user = "nobody" and group = "nogroup"): the master keeps root's rights. Unset, the workers stay
# the master's user.
user = os.environ.get("WORKER_USER")
group = os.environ.get("WORKER_GROUP")
