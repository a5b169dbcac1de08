// Test stand-in for what the WebUI's own page scripts give an extension (script.js, ui.js, inputAccordion.js):
// gradioApp(), onUiLoaded()/onUiUpdate(), updateInput(), and the enable checkbox in an InputAccordion header.
// Written for the test page; it follows the host's documented behaviour, not its code.
var hostUiLoaded = [];
var hostUiUpdate = [];

function gradioApp() {
    var app = document.getElementsByTagName("gradio-app")[0];
    return app && app.shadowRoot ? app.shadowRoot : document;
}

function onUiLoaded(callback) {
    hostUiLoaded.push(callback);
}

function onUiUpdate(callback) {
    hostUiUpdate.push(callback);
}

function updateInput(target) {
    target.dispatchEvent(new Event("input", {bubbles: true}));
}

// The host shows a checkbox in the accordion header that mirrors the hidden gradio checkbox.
function hostSetupInputAccordion(accordion) {
    var header = accordion.querySelector(".label-wrap");
    var hidden = gradioApp().querySelector("#" + accordion.id + "-checkbox input");
    var extra = gradioApp().querySelector("#" + accordion.id + "-extra");
    if (extra) header.insertBefore(extra, header.lastElementChild);
    var box = document.createElement("input");
    box.type = "checkbox";
    // gradio styles its checkboxes through its own (scoped) classes, so the header box borrows them.
    box.className = (hidden ? hidden.className + " " : "") + "input-accordion-checkbox";
    var isOpen = function() {
        return header.classList.contains("open");
    };
    box.checked = isOpen();
    header.querySelector("span").prepend(box);
    new MutationObserver(function() {
        box.checked = isOpen();
        if (hidden && hidden.checked !== box.checked) {
            hidden.checked = box.checked;
            updateInput(hidden);
        }
    }).observe(header, {attributes: true, attributeFilter: ["class"]});
}

document.addEventListener("DOMContentLoaded", function() {
    var loaded = false;
    new MutationObserver(function(mutations) {
        if (!loaded && gradioApp().querySelector("#txt2img_prompt")) {
            loaded = true;
            gradioApp().querySelectorAll(".input-accordion").forEach(hostSetupInputAccordion);
            hostUiLoaded.forEach(function(callback) {
                callback();
            });
        }
        hostUiUpdate.forEach(function(callback) {
            callback(mutations);
        });
    }).observe(gradioApp(), {childList: true, subtree: true});
});
