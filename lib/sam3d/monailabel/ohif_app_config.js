// OHIF's configuration as the sam3d app serves it at /ohif/app-config.js (sam3d.monailabel.ohif), in place of the
// one bundled with MONAI Label 0.8.5. One change, everything else as bundled: the "MONAI Label" mode shows OHIF's
// Segmentation panel as a second tab beside the MONAI Label panel. Its menu "Export & Download > Export DICOM SEG"
// stores the segmentation drawn in the viewer (an answer of the app, edited or not) on the PACS as a DICOM SEG
// series (STOW-RS through the app's /proxy/dicom), and the app's DICOMweb datastore takes the newest SEG of a
// series as that image's final label, which training reads. The bundled mode has no control that saves a label
// (its panel's client has save_label; nothing calls it). The mode is the bundled one, wrapped: same id, same
// route, its layout with one more right panel, and the export routed to the data source (below).
(function () {
  const MONAI_LABEL_MODE = '@ohif/mode-monai-label';
  const SEGMENTATION_PANEL = '@ohif/extension-cornerstone.panelModule.panelSegmentation';

  // The panel's "Export DICOM SEG" runs the command `storeSegmentation` with a segmentation id only. Two extensions
  // register that name: cornerstone's (context CORNERSTONE: stores through the active data source, then swaps the
  // viewport to the stored SEG, which fails in this mode's MPR layout and drops the labelmap being edited) and
  // cornerstone-dicom-seg's (context SEGMENTATION: needs `dataSource`). A call without a context gets the last
  // one, which fails with "Cannot read properties of undefined (reading 'store')" and the viewer says only
  // "Something went wrong". Here a call without `dataSource` stores through the active data source (the app's
  // /proxy/dicom, then the PACS) and says whether it worked; the labelmap stays in the viewer.
  function routeStoreSegmentation({ servicesManager, commandsManager, extensionManager }) {
    const store = commandsManager.getCommand('storeSegmentation', 'SEGMENTATION');
    if (!store || store.sam3dRouted) {
      return;
    }
    const notify = (type, message) =>
      servicesManager.services.uiNotificationService.show({ title: 'Export DICOM SEG', message, type });
    commandsManager.registerCommand('SEGMENTATION', 'storeSegmentation', {
      ...store,
      sam3dRouted: true,
      commandFn: async args => {
        if (args.dataSource) {
          return store.commandFn(args);
        }
        try {
          const report = await store.commandFn({ ...args, dataSource: extensionManager.getActiveDataSource()[0] });
          if (report) {
            notify('success', `Stored on the PACS as DICOM SEG "${report.SeriesDescription}": the final label of this series`);
          }
          return report;
        } catch (error) {
          console.error('sam3d: Export DICOM SEG failed', error);
          notify('error', `Not stored: ${error.message || error}`);
        }
      },
    });
  }

  const monaiLabelWithSegmentationPanel = {
    id: MONAI_LABEL_MODE, // read before the factory runs: the bundled mode of this id is then skipped
    modeFactory: async ({ modeConfiguration, loadModules }) => {
      const [bundled] = await loadModules([MONAI_LABEL_MODE]);
      const mode = await bundled.modeFactory({ modeConfiguration, loadModules });
      const onModeEnter = mode.onModeEnter;
      mode.onModeEnter = args => {
        const result = onModeEnter ? onModeEnter(args) : undefined;
        routeStoreSegmentation(args);
        return result;
      };
      mode.routes = mode.routes.map(route => ({
        ...route,
        layoutTemplate: args => {
          const layout = route.layoutTemplate(args);
          const rightPanels = layout.props.rightPanels || [];
          if (!rightPanels.includes(SEGMENTATION_PANEL)) {
            layout.props.rightPanels = [...rightPanels, SEGMENTATION_PANEL];
          }
          return layout;
        },
      }));
      return mode;
    },
  };

  window.config = {
    routerBasename: '/ohif/',
    showStudyList: true,
    extensions: [],
    modes: [monaiLabelWithSegmentationPanel],
    // below flag is for performance reasons, but it might not work for all servers
    showWarningMessageForCrossOrigin: true,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    defaultDataSourceName: 'dicomweb',
    useSharedArrayBuffer: 'FALSE',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'dicomweb',
        configuration: {
          friendlyName: 'Orthanc Server',
          name: 'Orthanc',
          wadoUriRoot: '/proxy/dicom/wado',
          qidoRoot: '/proxy/dicom/qido',
          wadoRoot: '/proxy/dicom/wado',
          qidoSupportsIncludeField: true,
          supportsReject: true,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: false,
          supportsFuzzyMatching: true,
          supportsWildcard: true,
          dicomUploadEnabled: true,
          bulkDataURI: {
            enabled: true,
          },
        },
      },
    ],
  };
})();
