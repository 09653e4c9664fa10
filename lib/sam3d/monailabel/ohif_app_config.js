// OHIF's configuration as the sam3d app serves it at /ohif/app-config.js (sam3d.monailabel.ohif), in place of the
// one bundled with MONAI Label 0.8.5. One change, everything else as bundled: the "MONAI Label" mode shows OHIF's
// Segmentation panel as a second tab beside the MONAI Label panel. Its menu "Export & Download > Export DICOM SEG"
// stores the segmentation drawn in the viewer (an answer of the app, edited or not) on the PACS as a DICOM SEG
// series (STOW-RS through the app's /proxy/dicom), and the app's DICOMweb datastore takes the newest SEG of a
// series as that image's final label, which training reads. The bundled mode has no control that saves a label
// (its panel's client has save_label; nothing calls it). The mode is the bundled one, wrapped: same id, same
// route, its layout with one more right panel, and the export routed to the data source with each frame of the SEG
// placed on the slice it was drawn on (below).
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
  //
  // The bundled exporter (@cornerstonejs/adapters' generateSegmentation, dcmjs) takes the labelmap's slices in the
  // order of the segmentation's imageIds (the display set's order: InstanceNumber) but gives frame i the position
  // and source image of the i-th slice of the series sorted by dcmjs (descending distance along the normal, row x
  // column). Where the two orders differ, as in a series whose InstanceNumber grows along the normal, every frame
  // is stored on another slice: the SEG is upside down (OHIF issues 5038, 5183). Each frame keeps the index of the
  // slice its pixels came from (FrameContentSequence.DimensionIndexValues[1]): before the SEG is stored, each frame
  // gets that slice's position and source image, so the SEG lies where the viewer drew it (a no-op where the
  // orders agree).
  function placeFramesOnTheirSlices(report, segmentationId, segmentationService) {
    const cs = window.cornerstone;
    const segmentation =
      segmentationService.getSegmentation(segmentationId) ||
      window.cornerstoneTools.segmentation.state.getSegmentation(segmentationId);
    const imageIds = segmentation.representationData.Labelmap.imageIds;
    const first = value => (Array.isArray(value) ? value[0] : value);
    const frames = [].concat(report.PerFrameFunctionalGroupsSequence || []);
    const sourceOf = frame => first(first(frame.DerivationImageSequence || {}).SourceImageSequence || {});
    if (!frames.length || frames.some(frame => !sourceOf(frame) || sourceOf(frame).ReferencedFrameNumber)) {
      return 0; // frames of a multi-frame image: dcmjs keeps their order
    }
    const slices = imageIds.map(imageId => {
      const source = cs.cache.getImage(imageId)?.referencedImageId;
      const plane = source && cs.metaData.get('imagePlaneModule', source);
      const instance = source && cs.metaData.get('instance', source);
      if (!plane || !instance) {
        throw new Error(`the labelmap's slice ${imageId} has no source image`);
      }
      // the instance's own values, as dcmjs copies them (the plane module's are longer than a DS may be)
      const position = instance.ImagePositionPatient || plane.imagePositionPatient;
      return { position, orientation: instance.ImageOrientationPatient || plane.imageOrientationPatient, instance };
    });
    // dcmjs's frame order, for the frames' DimensionIndexValues
    const [r, c] = [slices[0].orientation.slice(0, 3), slices[0].orientation.slice(3, 6)];
    const normal = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]];
    const distance = s => s.position.reduce((sum, v, k) => sum + (v - slices[0].position[k]) * normal[k], 0);
    const rank = new Map(
      slices.map((s, i) => [i, distance(s)]).sort((a, b) => b[1] - a[1]).map(([i], n) => [i, n + 1])
    );
    let moved = 0;
    for (const frame of frames) {
      const content = first(frame.FrameContentSequence);
      const index = content.DimensionIndexValues[1] - 1;
      const slice = slices[index];
      const source = sourceOf(frame);
      if (source.ReferencedSOPInstanceUID !== slice.instance.SOPInstanceUID) {
        moved++;
      }
      first(frame.PlanePositionSequence).ImagePositionPatient = [...slice.position];
      source.ReferencedSOPInstanceUID = slice.instance.SOPInstanceUID;
      source.ReferencedSOPClassUID = slice.instance.SOPClassUID || source.ReferencedSOPClassUID;
      content.DimensionIndexValues = [content.DimensionIndexValues[0], rank.get(index)];
    }
    console.log(`sam3d: Export DICOM SEG: ${moved} of ${frames.length} frames moved to the slice they were drawn on`);
    return moved;
  }

  // `dataSource`, whose store.dicom places the frames of a SEG on their slices before storing it.
  function withFramesOnTheirSlices(dataSource, segmentationId, segmentationService) {
    const store = dataSource.store;
    return Object.assign(Object.create(dataSource), {
      store: Object.assign(Object.create(store), {
        dicom: (report, ...rest) => {
          placeFramesOnTheirSlices(report, segmentationId, segmentationService);
          return store.dicom(report, ...rest);
        },
      }),
    });
  }

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
        const { segmentationService } = servicesManager.services;
        const placed = dataSource => withFramesOnTheirSlices(dataSource, args.segmentationId, segmentationService);
        if (args.dataSource) {
          return store.commandFn({ ...args, dataSource: placed(args.dataSource) });
        }
        try {
          const report = await store.commandFn({ ...args, dataSource: placed(extensionManager.getActiveDataSource()[0]) });
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
