"""``mltask app``: the task type's desktop-app way of use, as a local web application.

A requestor picks a task type from the registry, fills in a form generated from its JSON
Schema, submits, and watches the search live; a CLI user gets a live view of any task under
the same root. The app is a layer on top of the task type and the runner: it starts tasks as
``mltask tasks create`` / ``resume`` processes (so a search outlives the browser tab and the
app), and reads their state files read-only.

- :mod:`mltask.app.tasks`: where tasks are under the root, what state they are in, what a page shows;
- :mod:`mltask.app.drafts`: a new task being filled in: uploads, validation, starting it;
- :mod:`mltask.app.runs`: the background processes the app started, and abort / resume / delete;
- :mod:`mltask.app.security`: token, Host and CSRF checks, paths confined to the root;
- :mod:`mltask.app.web`: the Starlette routes and pages; :mod:`mltask.app.server`: ``mltask app``.
"""
