/* The launch form's upload progress: the dashboard's only script, and optional.
 *
 * Without it the form posts as usual and the page answers when the upload is done. With
 * it, a submit that carries a file is sent by XMLHttpRequest instead, with the same fields
 * and the button pressed, so its upload events can move a progress bar; the answer then
 * replaces the form (a refused file's verdict, the estimate, a field's error), or, when the
 * server redirected (a job was created), the browser goes there. Allowed by the launch
 * page's CSP: script-src 'self' and connect-src 'self', nothing inline.
 */
(function () {
  "use strict";

  function chosenFiles(form) {
    return Array.prototype.filter.call(form.querySelectorAll("input[type=file]"), function (input) {
      return input.files && input.files.length > 0;
    });
  }

  function setBusy(form, busy) {
    Array.prototype.forEach.call(form.querySelectorAll("button"), function (button) {
      button.disabled = busy;
    });
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-upload-progress")) return;
    if (!window.XMLHttpRequest || !window.FormData || !window.DOMParser) return;
    if (chosenFiles(form).length === 0) return; // nothing to show progress for
    event.preventDefault();

    // form.action would be the buttons named "action": the attribute is the URL.
    var target = new URL(form.getAttribute("action") || "", window.location.href);
    var data = new FormData(form);
    var submitter = event.submitter;
    if (submitter && submitter.name) data.append(submitter.name, submitter.value);
    var bar = form.querySelector(".upload-progress");
    var status = form.querySelector(".upload-status");
    bar.hidden = false;
    bar.removeAttribute("value"); // indeterminate until the first event
    status.textContent = "Uploading…";
    setBusy(form, true);

    var xhr = new XMLHttpRequest();
    xhr.open("POST", target.href);
    xhr.upload.addEventListener("progress", function (e) {
      if (!e.lengthComputable) return;
      bar.max = e.total;
      bar.value = e.loaded;
      status.textContent = "Uploading… " + Math.round((100 * e.loaded) / e.total) + "%";
    });
    xhr.upload.addEventListener("load", function () {
      status.textContent = "Uploaded; the server is checking the file…";
    });
    xhr.addEventListener("load", function () {
      var answered = new URL(xhr.responseURL || target.href, window.location.href);
      if (answered.pathname !== target.pathname) {
        window.location.assign(answered.href); // redirected: the new job's page
        return;
      }
      var page = new DOMParser().parseFromString(xhr.responseText, "text/html");
      var fresh = page.getElementById("launch");
      var current = document.getElementById("launch");
      if (!fresh || !current) {
        window.location.assign(answered.href);
        return;
      }
      current.replaceWith(document.importNode(fresh, true));
      document.title = page.title;
      var problem = document.querySelector("#launch [role=alert]");
      if (problem) problem.scrollIntoView({ block: "center" });
    });
    xhr.addEventListener("error", function () {
      status.textContent = "The upload failed: the connection was lost. Try again.";
      bar.hidden = true;
      setBusy(form, false);
    });
    xhr.send(data);
  });
})();
