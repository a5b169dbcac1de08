// DynFuse: keep the Subject/Style LoRA dropdowns in step with the <lora:...> tags of the prompt.
//
// The page script only reads the prompt and writes the tag names, as a JSON list, into a hidden textbox of
// the extension (#dynfuse_<tab>_tags); the server side refills both dropdowns from that textbox's change
// event. That keeps the dropdown internals of gradio 3 and 4 out of this file.
(function() {
    "use strict";

    var DYNFUSE_TABS = ["txt2img", "img2img"];
    var DYNFUSE_DEBOUNCE_MS = 300;
    // Programmatic prompt changes (pasted infotext, "Send to", styles) fire no input event.
    var DYNFUSE_POLL_MS = 1000;
    var DYNFUSE_TAG = /<(\w+):([^>]+)>/g; // the host's extra-network pattern
    var DYNFUSE_LORA_TYPES = ["lora", "lyco"];

    // LoRA names in prompt order, without repeats. Like the host, the name is the first positional argument:
    // arguments are split on ':', and an item with exactly one '=' is a named argument.
    function dynfuseLoraNames(prompt) {
        var names = [];
        var match;
        DYNFUSE_TAG.lastIndex = 0;
        while ((match = DYNFUSE_TAG.exec(prompt || "")) !== null) {
            if (DYNFUSE_LORA_TYPES.indexOf(match[1]) < 0) continue;
            var positional = match[2].split(":").filter(function(item) {
                return item.split("=").length !== 2;
            });
            if (positional.length && names.indexOf(positional[0]) < 0) names.push(positional[0]);
        }
        return names;
    }

    function dynfuseRoot() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function dynfuseField(id) {
        var box = dynfuseRoot().querySelector("#" + id);
        return box && box.querySelector("textarea, input");
    }

    function dynfuseSetValue(target, value) {
        target.value = value;
        if (typeof updateInput === "function") {
            updateInput(target); // the host's way of telling gradio about a value set from script
        } else {
            target.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    function dynfuseTabSync(tab) {
        var timer = null;
        var attached = null;

        function sync() {
            var prompt = dynfuseField(tab + "_prompt");
            var tags = dynfuseField("dynfuse_" + tab + "_tags");
            if (!prompt || !tags) return;
            if (prompt !== attached) { // first sight, or gradio re-rendered the prompt
                attached = prompt;
                prompt.addEventListener("input", schedule);
                prompt.addEventListener("change", schedule);
            }
            var text = JSON.stringify(dynfuseLoraNames(prompt.value));
            if (tags.value !== text) dynfuseSetValue(tags, text);
        }

        function schedule() {
            clearTimeout(timer);
            timer = setTimeout(sync, DYNFUSE_DEBOUNCE_MS);
        }

        return {sync: sync, schedule: schedule};
    }

    function dynfuseStart() {
        if (window.dynfuseStarted) return;
        window.dynfuseStarted = true;
        var tabs = DYNFUSE_TABS.map(dynfuseTabSync);
        tabs.forEach(function(tab) {
            tab.sync();
        });
        setInterval(function() {
            tabs.forEach(function(tab) {
                tab.sync();
            });
        }, DYNFUSE_POLL_MS);
    }

    window.dynfuseLoraNames = dynfuseLoraNames;

    if (typeof onUiLoaded === "function") {
        onUiLoaded(dynfuseStart); // the host's script.js: called once the UI exists
    } else {
        // Without the host's script.js: wait for gradio to render the prompt.
        document.addEventListener("DOMContentLoaded", function() {
            var observer = new MutationObserver(function() {
                if (dynfuseRoot().querySelector("#dynfuse_txt2img_tags, #dynfuse_img2img_tags")) {
                    observer.disconnect();
                    dynfuseStart();
                }
            });
            observer.observe(document.body, {childList: true, subtree: true});
        });
    }
})();
